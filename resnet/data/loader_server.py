"""The loader workers' fork server runs this first (workers.SERVER_PRELOAD): it imports the data
modules once, so each epoch's workers start by a cheap fork, and it ignores the stop signals,
so the server outlives a stop signal to its trainer's process group. Each child it forks gets
the default actions back (other users of the process's one fork server need them), and the
loader's workers then ignore the signals again (workers.init_worker). Nothing else imports
this module: importing it is what sets the server up.
"""
import os

import resnet.data.stream  # noqa: F401  (what the workers run: imported once, here)
from resnet.data.workers import default_stop_signals, ignore_stop_signals

ignore_stop_signals()
os.register_at_fork(after_in_child=default_stop_signals)
