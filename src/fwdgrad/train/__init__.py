"""What training runs need: the Trainer, datasets, the model zoo, checkpoints and measurements.

The training loop (:mod:`~fwdgrad.train.trainer`), checkpoints (:mod:`~fwdgrad.train.checkpoints`),
datasets and their files (:mod:`~fwdgrad.train.data`), the models (:mod:`~fwdgrad.train.models`),
atomic files, peak-memory measurement and the multi-tangent paper's learning rates. Only torch is
imported at module level; numpy, tqdm, TensorBoard, torchvision, mlxtend and scipy when used.

May import: torch, fwdgrad.core, fwdgrad.local.
"""
