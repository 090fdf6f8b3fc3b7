"""`python -m resnet.cli` (what the launch scripts run under accelerate launch and torchrun)."""
from resnet.cli import main

raise SystemExit(main())
