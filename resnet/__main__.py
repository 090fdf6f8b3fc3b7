from resnet.cli import main

raise SystemExit(main())
