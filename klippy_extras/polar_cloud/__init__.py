# Polar Cloud (polar3d.com) connection for Klipper
#
# Copyright (C) 2026  polar_cloud contributors
#
# This file may be distributed under the terms of the GNU GPLv3 license.
#
# Layout: extra.py is the Klipper-facing side (commands, webhooks,
# get_status, lifecycle); session.py the cloud session thread;
# protocol.py the pure Polar Cloud protocol; identity.py the key and
# serial storage; printer_state.py reads Klipper objects.
from .extra import PolarCloud


def load_config(config):
    return PolarCloud(config)
