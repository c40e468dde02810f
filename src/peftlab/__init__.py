"""peftlab: parameter-efficient fine-tuning, every method behind one interface.

The Python API that notebooks and the CLI use:

    import peftlab
    result = peftlab.train(method="lora", task="sst2", model="minilm", output="runs/lora")
    peftlab.evaluate("runs/lora")
    peftlab.predict("runs/lora", ["a gripping, funny film"])
"""

from peftlab.errors import PeftlabError  # noqa: E402
from peftlab.version import __version__  # noqa: E402
from peftlab.quiet import silence_startup_noise  # noqa: E402

silence_startup_noise()


def __getattr__(name):  # lazy: importing peftlab must not import torch
    if name in {"train", "TrainConfig"}:
        from peftlab import training

        return getattr(training, name)
    if name in {"evaluate", "predict", "load_trained"}:
        from peftlab import inference

        return getattr(inference, name)
    raise AttributeError(name)


__all__ = ["PeftlabError", "train", "TrainConfig", "evaluate", "predict", "load_trained", "__version__"]
