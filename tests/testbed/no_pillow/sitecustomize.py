# Test aid: make a Python behave as if Pillow were not installed
# (PYTHONPATH=tests/testbed/no_pillow).  A None entry in sys.modules makes
# the import fail and find_spec return None.
import sys

sys.modules["PIL"] = None
