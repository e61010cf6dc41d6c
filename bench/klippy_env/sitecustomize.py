# Bench aid: klippy's Python sees only what a printer's klippy-env has.
# The project venv also holds the test bed's packages; python-engineio
# imports aiohttp at load when it is installed (its asyncio client), which
# would add ~10 MB and ~150 ms to klippy that install.sh never installs.
# A None entry in sys.modules makes `import aiohttp` fail as if absent.
# Used with PYTHONPATH=bench/klippy_env for every klippy the bench starts.
import sys

sys.modules["aiohttp"] = None
