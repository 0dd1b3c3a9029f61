"""A GraphModule with one graph per mode, for models whose forward depends on ``self.training``.

torch.fx resolves ``if self.training:`` when it traces, so one trace keeps one mode's branch:
torchvision's inception_v3 and googlenet run their auxiliary heads only in training. A
:class:`ModalGraphModule` holds the training trace as ``graph`` and the evaluation trace as
``eval_graph`` over one set of submodules, and ``forward`` runs the graph of the current mode.
"""

from __future__ import annotations

import copy
from collections.abc import Callable
from typing import Any

from torch import fx, nn
from torch.fx.graph_module import _assign_attr, _forward_from_src


class ModalGraphModule(fx.GraphModule):
    """GraphModule whose ``forward`` is ``graph``'s in training mode and ``eval_graph``'s in eval mode.

    Args:
        root: Module (or dict of target -> object) holding every submodule either graph uses.
        graph: The training-mode graph.
        eval_graph: The eval-mode graph.
        class_name: Name of the generated class.
    """

    def __init__(
        self, root: nn.Module | dict[str, Any], graph: fx.Graph, eval_graph: fx.Graph, class_name: str = "GraphModule"
    ) -> None:
        object.__setattr__(self, "_eval_graph", eval_graph)
        super().__init__(root, graph, class_name)
        for node in eval_graph.nodes:
            if node.op in ("call_module", "get_attr") and not _has(self, str(node.target)):
                value = root[node.target] if isinstance(root, dict) else _get(root, str(node.target))
                _assign_attr(value, self, str(node.target))
        self.recompile()

    @property
    def eval_graph(self) -> fx.Graph:
        """The graph ``forward`` runs in eval mode."""
        return self.__dict__["_eval_graph"]

    def graph_for(self, training: bool) -> fx.Graph:
        """Return the graph of one mode."""
        return self.graph if training else self.eval_graph

    def recompile(self) -> Any:
        """Generate both forwards (training from ``graph``, eval from ``eval_graph``)."""
        code = super().recompile()
        eval_graph = self.__dict__.get("_eval_graph")
        if eval_graph is None:
            return code
        cls = type(self)
        train_forward = cls.forward
        python_code = eval_graph.python_code(root_module="self")
        eval_forward = _forward_from_src(python_code.src, python_code.globals, {})

        def forward(self: nn.Module, *args: Any, **kwargs: Any) -> Any:
            return (train_forward if self.training else eval_forward)(self, *args, **kwargs)

        cls.forward = forward
        return code

    def delete_all_unused_submodules(self) -> None:
        """Delete submodules neither graph uses."""
        used: set[str] = set()
        for graph in (self.graph, self.eval_graph):
            for node in graph.nodes:
                if node.op not in ("call_module", "get_attr"):
                    continue
                path = str(node.target).split(".")
                used.update(".".join(path[: i + 1]) for i in range(len(path)))
                if node.op == "call_module":
                    sub = self.get_submodule(str(node.target))
                    used.update(f"{node.target}.{name}" for name, _ in sub.named_modules() if name)
        for name in [n for n, _ in self.named_modules() if n and n not in used]:
            if _has(self, name):
                self.delete_submodule(name)

    def _deepcopy_init(self) -> Callable[..., None]:
        def init(res: ModalGraphModule, fake_mod: nn.Module, graph: fx.Graph) -> None:
            ModalGraphModule.__init__(res, fake_mod, graph, fake_mod.__dict__["_eval_graph"])

        return init

    def __reduce__(self) -> tuple[Any, ...]:
        # Pickling regenerates a GraphModule from code; keep both graphs by pickling a copy's parts.
        return (_rebuild, (dict(self.named_children()), copy.deepcopy(self.graph), copy.deepcopy(self.eval_graph)))


def _rebuild(children: dict[str, nn.Module], graph: fx.Graph, eval_graph: fx.Graph) -> ModalGraphModule:
    root = nn.Module()
    for name, child in children.items():
        root.add_module(name, child)
    return ModalGraphModule(root, graph, eval_graph)


def _get(root: nn.Module, target: str) -> Any:
    obj: Any = root
    for part in target.split("."):
        obj = getattr(obj, part)
    return obj


def _has(root: nn.Module, target: str) -> bool:
    try:
        _get(root, target)
    except AttributeError:
        return False
    return True


def graph_for(model: nn.Module, training: bool = False) -> fx.Graph | None:
    """Return the graph a GraphModule runs in one mode (None for a module that is not one)."""
    if isinstance(model, ModalGraphModule):
        return model.graph_for(training)
    return model.graph if isinstance(model, fx.GraphModule) else None
