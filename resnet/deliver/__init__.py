"""Delivery: trained weights out of a run, to users.

    source.py   WEIGHTS (run dir, final/, checkpoint, exported folder, hf-hub:ORG/NAME) -> Trained
    hub.py      timm's Hub format: config.json, examples, push to the Hugging Face Hub
    card.py     the model card (README.md with YAML front matter)
    export.py   `resnet export`: hf | torchvision | onnx
    predict.py  `resnet predict`: images -> top-k classes, preprocessed as the run's evaluation
    app.py      the Gradio app itself; standalone (gradio, torch, timm) so a Space runs it as is
    demo.py     `resnet demo`: app.py around a Trained model

Imports run one way: this package uses the ground floor (resnet.model, resnet.data,
resnet.runfolder, resnet.weights) and no training code; nothing there imports it.
"""
