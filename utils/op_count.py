"""Count the tensor operators a piece of code dispatches (a proxy for kernel launches on a GPU)."""
from __future__ import annotations

import collections

from torch.utils._python_dispatch import TorchDispatchMode

NO_KERNEL = {"view", "_unsafe_view", "reshape", "_reshape_alias", "slice", "select", "permute", "expand",
             "transpose", "t", "unsqueeze", "squeeze", "unflatten", "as_strided", "alias", "detach", "split",
             "split_with_sizes", "unbind", "lift_fresh", "_record_function_enter_new", "_record_function_exit"}


class OpCounter(TorchDispatchMode):
    """Counts the operators that reach dispatch (below autograd and functorch transforms), by name.

    Use as a context manager: ``with OpCounter() as c: step()``, then ``c.ops`` (a Counter of
    operator names) and ``c.computing()``. Counting slows the code down; never leave it on in a run.
    """

    def __init__(self):
        super().__init__()
        self.ops: collections.Counter = collections.Counter()

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        self.ops[func.overloadpacket.__name__] += 1
        return func(*args, **(kwargs or {}))

    def computing(self) -> int:
        """Operations that compute (launch a kernel on a GPU): all but views and profiler markers."""
        return sum(n for name, n in self.ops.items() if name not in NO_KERNEL)


def count_ops(fn) -> OpCounter:
    """Run ``fn()`` once and return the counter of the operators it dispatched."""
    with OpCounter() as counter:
        fn()
    return counter
