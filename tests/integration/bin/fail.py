"""A rank that imports nothing heavy and always raises (for max_restarts tests)."""

import hpt

hpt.init(init_process_group=False)
raise ValueError("deliberate failure for the test")
