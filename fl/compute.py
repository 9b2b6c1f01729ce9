"""The compute device: one key, ``compute``, says where the run's tensors are computed.

    compute=auto      (default) ``cuda`` when ``torch.cuda.is_available()``, else ``cpu``
    compute=cpu       the CPU, even where there is a GPU
    compute=cuda      the current CUDA device (``torch.cuda.current_device()``, normally GPU 0)
    compute=cuda:N    CUDA device N (0 <= N < ``torch.cuda.device_count()``)

The name is ``compute``, not ``device``: ``device=...`` is the config group of simulated client
device profiles (``sim_configs/device/``), which time clients; this key places tensors.

How the choice is made and used:

- ``resolve_compute(value)`` turns the key into a ``torch.device`` once per process (cached), and
  is the only place that reads it: a value it does not know, ``cuda`` where torch has no CUDA, or
  a GPU index that does not exist is a ``ConfigError`` naming the key and what to do, found by
  ``fl.config.build`` before any run directory is written (``error: compute: ...``, exit 2).
- Where the device applies is where work is done: a client's local training and evaluation (the
  ClientApp places its resident model there, ``clients.trainer.ClientEnv``), central evaluation
  (``fl.server``), a strategy's own server-side steps (DELTA's tier accuracies, AgileNN's remote
  head), the plugins' measurements (``fl.hooks.RunView.device``), and the central DELTA steps
  (``fl.delta.pair``/``construct``, ``python -m fl.delta.pretrain``, ``python -m fl.explain``).
  Training code follows the model: batches go to ``model_device(model)``
  (``fl.local_training.ClientData.batches``), so a model left on the CPU (an int8-quantized one,
  which has no CUDA kernels) still works.
- The payload never leaves the CPU: a client moves its state to the CPU before it encodes its
  reply (``to_cpu``, one copy per dtype), every codec decodes into CPU tensors from NumPy, and
  received weights are copied onto the device by ``load_state_dict``. The bytes sent and counted
  are therefore the same on every device; on the CPU every call here is the identity
  (``Tensor.to``/``Module.to`` to the device a tensor is on returns it as it is), so a CPU run is
  bit-identical to one without the key.
- Where a client runs decides its device: a simulated client resolves the run's value in the
  process that trains it (a Ray worker on a GPU node resolves ``auto`` to its GPU even when the
  driver has none); a deployed SuperNode takes ``--node-config compute=...`` over the run's value,
  ``auto`` when neither says (``fl.deploy.device``).
- Files are loaded with ``map_location="cpu"`` (checkpoints, the DELTA cache, ``fl.export``) and
  written from CPU tensors, so a run's files load on any machine.

Results on a GPU are not bit-identical to the CPU's (other kernels, other float reassociation);
they agree within float tolerance, and the bytes counted are identical.
"""

from __future__ import annotations

import contextlib
import functools
import re
from typing import Hashable, Iterator, Mapping, Sequence, TypeVar

import torch
from torch import nn

from fl.errors import ConfigError

COMPUTE_KEY = "compute"
COMPUTE_CHOICES = ("auto", "cpu", "cuda", "cuda:N")
Key = TypeVar("Key", bound=Hashable)  # a state's tensor names
_CUDA_INDEX = re.compile(r"^cuda:(\d+)$")
CPU = torch.device("cpu")


def resolve_compute(value: object = "auto", key: str = COMPUTE_KEY) -> torch.device:
    """The ``torch.device`` the key names on this machine (a ``torch.device`` as it is); a
    ``ConfigError`` naming ``key`` if it names none. Resolved once per process and value (cached)."""
    if isinstance(value, torch.device):
        return value
    if not isinstance(value, str):
        raise ConfigError(key, f"must be one of {', '.join(COMPUTE_CHOICES)}, got {value!r}")
    return _resolve(value.strip().lower(), key)


@functools.lru_cache(maxsize=None)
def _resolve(value: str, key: str) -> torch.device:
    if value == "auto":
        return torch.device("cuda") if torch.cuda.is_available() else CPU
    if value == "cpu":
        return CPU
    match = _CUDA_INDEX.match(value)
    if value != "cuda" and match is None:
        raise ConfigError(key, f"unknown value {value!r}; allowed: {', '.join(COMPUTE_CHOICES)} (N a GPU index)")
    if not torch.cuda.is_available():
        raise ConfigError(key, f"{value} asks for a CUDA GPU but torch finds none on this machine "
                               f"(torch {torch.__version__}, CUDA build: {torch.version.cuda or 'no'}); "
                               f"set {key}=cpu or {key}=auto, or run where a GPU is")
    count = torch.cuda.device_count()
    if match is not None and int(match.group(1)) >= count:
        raise ConfigError(key, f"{value}: there is no GPU {match.group(1)}, this machine has {count} "
                               f"(cuda:0{f' to cuda:{count - 1}' if count > 1 else ''}); choose one of those")
    return torch.device(value)


def model_device(model: nn.Module) -> torch.device:
    """Where ``model`` computes: the device of its first parameter (or buffer); the CPU for a model
    with neither (e.g. an int8-quantized one, whose packed weights are not parameters)."""
    for tensor in model.parameters():
        return tensor.device
    for tensor in model.buffers():
        return tensor.device
    return CPU


def to_cpu(state: Mapping[Key, torch.Tensor]) -> dict[Key, torch.Tensor]:
    """``state`` with every tensor detached on the CPU: what a codec encodes. The same tensors
    (no copy) when they are on the CPU already; those on an accelerator cross in one copy per
    device and dtype (``one_copy``), so a reply costs one host round trip, not one per tensor."""
    detached = {name: tensor.detach() for name, tensor in state.items()}
    copied = one_copy({name: t for name, t in detached.items() if t.device.type != "cpu"})
    return {name: copied.get(name, t) for name, t in detached.items()}


def all_to_cpu(states: Sequence[Mapping[str, torch.Tensor]]) -> list[dict[str, torch.Tensor]]:
    """``to_cpu`` of several states (the replies of K vectorized clients) in one copy per device and
    dtype for all of them."""
    merged = to_cpu({(i, name): t for i, state in enumerate(states) for name, t in state.items()})
    return [{name: merged[(i, name)] for name in state} for i, state in enumerate(states)]


def one_copy(tensors: Mapping[Key, torch.Tensor]) -> dict[Key, torch.Tensor]:
    """Copies of ``tensors`` on the CPU, one transfer per (device, dtype) group: the group is
    concatenated flat where it is, copied once, and each tensor is a view of that host copy in its
    own shape, with the same values."""
    groups: dict[tuple[torch.device, torch.dtype], list[Key]] = {}
    for name, tensor in tensors.items():
        groups.setdefault((tensor.device, tensor.dtype), []).append(name)
    copied: dict[Key, torch.Tensor] = {}
    for names in groups.values():
        flat = torch.cat([tensors[name].reshape(-1) for name in names]).cpu()
        for name, part in zip(names, flat.split([tensors[name].numel() for name in names])):
            copied[name] = part.view(tensors[name].shape)
    return {name: copied[name] for name in tensors}


@contextlib.contextmanager
def placed(model: nn.Module, device: torch.device) -> Iterator[nn.Module]:
    """``model`` moved to ``device`` for the ``with`` block and back to where it was after, for a
    step that runs on the compute device in the middle of CPU-side work (pruning, profiling)."""
    home = model_device(model)
    model.to(device)
    try:
        yield model
    finally:
        model.to(home)


def peak_accelerator_memory() -> int | None:
    """The most bytes this process held allocated on its CUDA devices at once (``torch.cuda.
    max_memory_allocated``, summed over the devices), or None when it used no CUDA device."""
    if not torch.cuda.is_available() or not torch.cuda.is_initialized():
        return None
    return sum(torch.cuda.max_memory_allocated(index) for index in range(torch.cuda.device_count()))
