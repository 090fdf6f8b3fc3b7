"""Names of the files a run leaves in its run.dir that more than one module reads or writes.

Kept free of heavy imports, so that `resnet report` reads a run without loading torch.
"""
METRICS_FILE = "metrics.jsonl"  # one JSON line per logged step (resnet.train.metrics)
CONSOLE_LOG = "console.log"  # everything `resnet quickstart`'s commands printed
