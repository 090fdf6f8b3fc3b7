"""The loader workers' fork server runs this first (stream.SERVER_PRELOAD): it imports the data
modules once, so each epoch's workers start by a cheap fork, and it ignores the stop signals,
so the server outlives a stop signal to its trainer's process group (its workers ignore them
too: stream.ignore_stop_signals). Nothing else imports this module: importing it is what sets
the server up.
"""
from resnet.data.stream import ignore_stop_signals

ignore_stop_signals()
