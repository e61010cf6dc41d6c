# Test aid: make klippy's Python behave as if python-socketio were not
# installed (PYTHONPATH=tests/testbed/no_socketio).  A None entry in
# sys.modules makes import fail and find_spec return None.
import sys

sys.modules["socketio"] = None
