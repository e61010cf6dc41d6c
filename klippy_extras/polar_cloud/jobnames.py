# Job file names and job ids as shown: pure helpers
#
# A cloud job's file is named from its job name and its id, never taken
# raw from the cloud; a job id on the console or in a log line is
# printable and short.
#
# This file may be distributed under the terms of the GNU GPLv3 license.
from __future__ import annotations

import hashlib
import re
import unicodedata
from typing import Optional

from . import protocol

JOB_FILE_RE = re.compile(r"_polar-([A-Za-z0-9_-]{1,64})\.gcode\Z")


def job_file_token(job_id: str) -> str:
    """The job's part of its file name: '-' and the id when the id is a
    safe token, else '.' and a short hash of it (the id itself is kept in
    the job state, see Job)."""
    if protocol.JOB_ID_RE.fullmatch(job_id):
        return "-" + job_id
    raw = job_id.encode("utf-8", "surrogatepass")
    return "." + hashlib.sha256(raw).hexdigest()[:16]


def safe_job_filename(job_name: str, job_id: str) -> str:
    """A file name readable in Mainsail/Fluidd, never taken raw from the
    cloud: ASCII letters, digits, '_', '-' and '.' only, no leading dot."""
    text = unicodedata.normalize("NFKD", job_name or "")
    text = text.encode("ascii", "ignore").decode("ascii")
    text = re.sub(r"\.(gcode|gco|g|stl|3mf)\Z", "", text, flags=re.I)
    text = re.sub(r"[^A-Za-z0-9_.-]+", "_", text).strip("._-")
    text = re.sub(r"\.{2,}", ".", text)[:60].strip("._-") or "polar_job"
    return "%s_polar%s.gcode" % (text, job_file_token(job_id))


def job_id_from_filename(filename: str) -> Optional[str]:
    """The job id in a file name made from a safe id; None for others
    (a hashed name: the id is in the job state)."""
    match = JOB_FILE_RE.search(filename or "")
    return match.group(1) if match else None


def shown_id(job_id: str) -> str:
    """A job id for a console or log line: no control characters, not
    longer than a line should be."""
    text = "".join(c if c.isprintable() else "?" for c in job_id)
    return text if len(text) <= 64 else text[:61] + "..."
