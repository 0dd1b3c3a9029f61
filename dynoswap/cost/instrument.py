"""fvcore attribution: a copy of a traced graph in which every functional op is a module call.

fvcore reports MACs per module; wrapping each ``call_function`` / ``call_method`` node in a
:class:`_Call` module gives every MAC a graph node to land on.
"""

from __future__ import annotations

from typing import Any

from torch import fx, nn


class _Call(nn.Module):
    """One functional op of the graph as a module, so fvcore reports its MACs under its own name."""

    def __init__(self, op: str, target: Any) -> None:
        super().__init__()
        self.op, self.target = op, target

    def forward(self, *args: Any, **kwargs: Any) -> Any:
        if self.op == "call_method":
            return getattr(args[0], self.target)(*args[1:], **kwargs)
        return self.target(*args, **kwargs)


#: Prefix of the wrapper modules of functional ops.
CALL_PREFIX = "_dynoswap_call_"


def instrumented(model: nn.Module, graph: fx.Graph) -> fx.GraphModule:
    """Copy the graph into a GraphModule sharing ``model``'s modules in which every functional op is a module call."""
    new = fx.Graph()
    env: dict[fx.Node, fx.Node] = {}
    owned: dict[str, Any] = {}
    for n in graph.nodes:
        if n.op in ("call_function", "call_method"):
            name = CALL_PREFIX + n.name
            owned[name] = _Call(n.op, n.target)
            args = fx.node.map_arg(n.args, lambda a: env[a])
            kwargs = fx.node.map_arg(n.kwargs, lambda a: env[a])
            env[n] = new.create_node("call_module", name, args, kwargs, name=n.name)
            continue
        if n.op in ("call_module", "get_attr"):
            owned[n.target] = _get(model, n.target)
        env[n] = new.node_copy(n, lambda a: env[a])
    return fx.GraphModule(owned, new)


def _get(model: nn.Module, target: str) -> Any:
    obj: Any = model
    for part in target.split("."):
        obj = getattr(obj, part)
    return obj
