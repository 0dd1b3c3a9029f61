"""Ship the learned shapes: freeze DynOPools into standard ops, write ONNX / torch.export files, verify them."""

from .freeze import FROZEN_KEY, FrozenPool, FrozenSpec, describe, freeze, is_frozen, refreeze

__all__ = ["FROZEN_KEY", "FrozenPool", "FrozenSpec", "describe", "freeze", "is_frozen", "refreeze"]
