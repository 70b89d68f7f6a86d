"""The PyTorch networks `train.model` can name, and their model file: save, load, predict.

The same four networks as stages/frameworks/keras/model.py, layer for layer, written as PyTorch
users write them: `nn.Module`s whose forward() returns logits (the softmax is in the
loss, F.cross_entropy, and in predict()). Two conventions are set to Keras' so that one
recipe means the same training in both frameworks:

- initial weights: Glorot-uniform weights and zero biases (Keras' defaults; PyTorch's own
  are Kaiming-uniform with uniform biases). The distribution is the same, the draws are
  not: the frameworks have different random generators.
- BatchNorm: PyTorch's `momentum` is the weight of the new batch, Keras' the weight of the
  running average: Keras' 0.99 is PyTorch's 0.01; epsilon 1e-3 as in Keras (PyTorch's
  default is 1e-5). PyTorch updates the running variance with the unbiased batch variance,
  Keras with the biased one: a factor m/(m-1), m = batch × height × width ≥ 2048 values.

The model file is a safetensors file: tensors only, no pickle, so loading it runs no code.
The architecture is named in its header and in run_info.json:

    model = torch_model.build("cnn")
    model.load_state_dict(safetensors.torch.load_file("data/model/model.safetensors"))
"""

from __future__ import annotations

import functools
from pathlib import Path

import numpy as np

from stages.data.mnist import IMAGE_SIDE
from stages.frameworks.files import size_of
from stages.frameworks.torch.env import torch
from stages.runtime.failures import DataError
from stages.runtime.outputs import atomic_path

nn = torch.nn

MODEL_FILE = "model.safetensors"
KERAS_BATCHNORM = {"eps": 1e-3, "momentum": 0.01}


class MLP(nn.Module):
    """The original script's network: Flatten, Dense 128 ReLU, Dropout 0.2, Dense 10."""

    name = "mlp"

    def __init__(self):
        super().__init__()
        self.flatten = nn.Flatten()
        self.fc1 = nn.Linear(IMAGE_SIDE * IMAGE_SIDE, 128)
        self.dropout = nn.Dropout(0.2)
        self.fc2 = nn.Linear(128, 10)

    def forward(self, x):
        x = torch.relu(self.fc1(self.flatten(x)))
        return self.fc2(self.dropout(x))


def conv_pool_bn_relu(in_channels: int, out_channels: int, size: int) -> nn.Sequential:
    # Pooling straight after the conv: BatchNorm and ReLU see a quarter of the values.
    return nn.Sequential(nn.Conv2d(in_channels, out_channels, size, bias=False),
                         nn.MaxPool2d(2), nn.BatchNorm2d(out_channels, **KERAS_BATCHNORM),
                         nn.ReLU())


def conv_bn_relu(in_channels: int, out_channels: int) -> nn.Sequential:
    # 3×3, padded to keep the size (Keras' padding="same"); no bias: BatchNorm shifts.
    return nn.Sequential(nn.Conv2d(in_channels, out_channels, 3, padding=1, bias=False),
                         nn.BatchNorm2d(out_channels, **KERAS_BATCHNORM), nn.ReLU())


class CNN(nn.Module):
    """The default: 5×5 convs 32 and 64, each max-pooled before BatchNorm, a 3×3 conv 128
    on the 4×4 map, dropout 0.3 and a linear read-out."""

    name = "cnn"

    def __init__(self):
        super().__init__()
        self.features = nn.Sequential(conv_pool_bn_relu(1, 32, 5), conv_pool_bn_relu(32, 64, 5),
                                      conv_bn_relu(64, 128))
        self.dropout = nn.Dropout(0.3)
        self.fc = nn.Linear(128 * 4 * 4, 10)

    def forward(self, x):
        x = self.features(x.unsqueeze(1))  # [n, 28, 28] -> one channel
        return self.fc(self.dropout(torch.flatten(x, 1)))


class Fast(nn.Module):
    """The `fast` preset: 5×5 convs 16 and 32, each max-pooled before BatchNorm, then
    Dense 128 with BatchNorm, dropout 0.2 and a linear read-out."""

    name = "fast"

    def __init__(self):
        super().__init__()
        self.features = nn.Sequential(conv_pool_bn_relu(1, 16, 5), conv_pool_bn_relu(16, 32, 5))
        self.head = nn.Sequential(
            nn.Flatten(), nn.Linear(32 * 4 * 4, 128, bias=False),
            nn.BatchNorm1d(128, **KERAS_BATCHNORM), nn.ReLU(), nn.Dropout(0.2),
            nn.Linear(128, 10))

    def forward(self, x):
        return self.head(self.features(x.unsqueeze(1)))


class CNNLarge(nn.Module):
    """VGG-style: two 3×3 convs per block at 28×28 and 14×14, then Dense 256 with
    BatchNorm; several times the multiply-adds of CNN."""

    name = "cnn_large"

    def __init__(self):
        super().__init__()
        blocks = []
        for in_channels, width in ((1, 32), (32, 64)):
            blocks += [conv_bn_relu(in_channels, width), conv_bn_relu(width, width),
                       nn.MaxPool2d(2), nn.Dropout(0.25)]
        self.features = nn.Sequential(*blocks)
        self.head = nn.Sequential(
            nn.Flatten(), nn.Linear(64 * 7 * 7, 256, bias=False),
            nn.BatchNorm1d(256, **KERAS_BATCHNORM), nn.ReLU(), nn.Dropout(0.4),
            nn.Linear(256, 10))

    def forward(self, x):
        return self.head(self.features(x.unsqueeze(1)))


MODELS = {net.name: net for net in (MLP, CNN, CNNLarge, Fast)}


def keras_init(module: nn.Module) -> None:
    """Keras' default initialisation: Glorot-uniform weights, zero biases."""
    if isinstance(module, (nn.Linear, nn.Conv2d)):
        nn.init.xavier_uniform_(module.weight)
        if module.bias is not None:
            nn.init.zeros_(module.bias)


def build(name: str) -> nn.Module:
    model = MODELS[name]()
    model.apply(keras_init)
    return model


# --- the model file ----------------------------------------------------------------------


def save(model: nn.Module, model_dir: Path) -> None:
    """The weights and BatchNorm statistics as safetensors, byte-stable (no clock, no
    pickle), the architecture's name in the header."""
    from safetensors.torch import save

    tensors = {k: v.detach().cpu().contiguous() for k, v in model.state_dict().items()}
    with atomic_path(Path(model_dir) / MODEL_FILE) as tmp:
        tmp.write_bytes(save(tensors, metadata={"model": model.name}))


# Bytes of JSON a model file's header may take: this project's networks need a few KB.
HEADER_CAP = 1 << 20
# The dtype each tensor of a state_dict has in a safetensors header.
DTYPES = {torch.float32: ("F32", 4), torch.int64: ("I64", 8)}


@functools.cache
def largest_tensors() -> int:
    """Bytes of tensors in the largest network's model file (built once per process)."""
    return max(sum(v.numel() * DTYPES[v.dtype][1] for v in net().state_dict().values())
               for net in MODELS.values())


def checked_network(path: Path) -> nn.Module:
    """The untrained network a safetensors model file names, once its header has been read
    (at most HEADER_CAP bytes) and found to describe exactly that network's tensors: names,
    dtypes, shapes and offsets that tile the rest of the file. Nothing past the header is
    read here, and a file that claims more than the network holds is refused unread."""
    import json

    size = size_of(path, 8 + HEADER_CAP + largest_tensors())
    with open(path, "rb") as f:
        head = f.read(8)
        length = int.from_bytes(head, "little")
        if len(head) < 8 or length > min(HEADER_CAP, size - 8):
            raise DataError(f"{path}: not a safetensors model file of this project (a "
                            f"header of {length:,} bytes in a file of {size:,})")
        try:
            header = json.loads(f.read(length))
        except (ValueError, RecursionError):  # RecursionError: nested past the stack
            raise DataError(f"{path}: its safetensors header is not JSON") from None
    if not isinstance(header, dict):
        raise DataError(f"{path}: its safetensors header is not a JSON object")
    metadata = header.pop("__metadata__", None)
    name = metadata.get("model") if isinstance(metadata, dict) else None
    if not isinstance(name, str) or name not in MODELS:
        raise DataError(f"{path}: names no network of this project ({name!r}); "
                        f"expected one of {', '.join(MODELS)}")
    model = MODELS[name]()
    expected = {key: ([*value.shape], *DTYPES[value.dtype])
                for key, value in model.state_dict().items()}
    if set(header) != set(expected):
        odd = sorted(set(header) ^ set(expected))[0]
        raise DataError(f"{path}: its tensors are not those of the {name} "
                        f"(e.g. {odd[:60]!r})")
    for key, entry in header.items():
        offsets = entry.get("data_offsets") if isinstance(entry, dict) else None
        if not (isinstance(offsets, list) and len(offsets) == 2
                and all(type(o) is int for o in offsets)):
            raise DataError(f"{path}: tensor {key}'s header entry is not a safetensors one")
    end = 0
    for key, (shape, dtype, width) in sorted(expected.items(),
                                              key=lambda kv: header[kv[0]]["data_offsets"]):
        entry = header[key]
        count = int(np.prod(shape)) * width
        if (entry.get("dtype"), entry.get("shape"), entry.get("data_offsets")) != (
                dtype, shape, [end, end + count]):
            raise DataError(f"{path}: tensor {key} is {entry.get('dtype')} "
                            f"{entry.get('shape')}; the {name} has {dtype} {shape}")
        end += count
    if 8 + length + end != size:
        raise DataError(f"{path}: {size:,} bytes; the {name}'s model file has "
                        f"{8 + length + end:,}")
    return model


def load(model_dir: Path) -> nn.Module:
    """The network a model file holds, in eval mode; one line if it is not one of ours."""
    from safetensors import SafetensorError, safe_open

    path = Path(model_dir) / MODEL_FILE
    model = checked_network(path)
    try:
        with safe_open(path, "pt") as f:
            model.load_state_dict({key: f.get_tensor(key) for key in f.keys()})
    except (OSError, SafetensorError, RuntimeError, ValueError) as err:
        raise DataError(f"{path}: cannot load the model ({err})") from None
    return model.eval()


@torch.inference_mode()
def predict(model: nn.Module, x: np.ndarray, batch_size: int) -> np.ndarray:
    """Class probabilities for every image, N×10 float32 (on the CPU)."""
    model.eval()
    return np.concatenate([
        torch.softmax(model(torch.from_numpy(x[start:start + batch_size])), 1).numpy()
        for start in range(0, len(x), batch_size)]).astype(np.float32)
