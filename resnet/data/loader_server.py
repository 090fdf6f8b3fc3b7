"""The loader workers' fork server runs this first (workers.SERVER_PRELOAD): it imports the data
modules once, so each epoch's workers start by a cheap fork, and it ignores the stop signals,
so the server outlives a stop signal to its trainer's process group (its workers ignore them
too: workers.ignore_stop_signals). Nothing else imports this module: importing it is what sets
the server up.
"""
import resnet.data.stream  # noqa: F401  (what the workers run: imported once, here)
from resnet.data.workers import ignore_stop_signals

ignore_stop_signals()
