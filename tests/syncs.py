"""Count host synchronisations on any device, CPU included.

``torch.cuda.set_sync_debug_mode`` only exists where there is a GPU; this counter works on the CPU
test machine by watching the aten ops that force the host to wait for the device:

* ``aten._local_scalar_dense``: every ``.item()``, ``bool(t)``, ``float(t)``, ``int(t)``, ``if t:``,
  and the ``.any().item()`` that composite linalg functions use to check LAPACK error codes;
* ops whose output shape depends on the data (``nonzero``, ``masked_select``, ``unique``...);
* ``aten.equal`` and ``is_nonzero``;
* ``_linalg_check_errors`` (the error check of ``torch.linalg.cholesky``, ``inv``, ``solve``...);
* device kernels that check their error codes on the host before returning, so that their
  ``.item()`` runs inside the kernel where no Python mode sees it: ``_linalg_eigh``
  (``torch.linalg.eigh``/``eigvalsh`` have no ``_ex`` variant), ``_linalg_svd``, ``linalg_eig``,
  and the ``_ex`` factorisations called with ``check_errors=True``.

Transfers to the host (``.cpu()``, ``.tolist()``) synchronise too; ``.tolist()`` goes through
``_local_scalar_dense`` per element, and copies are counted when their destination is the CPU
while the source is not.
"""
from __future__ import annotations

from collections import Counter

import torch
from torch.utils._python_dispatch import TorchDispatchMode

aten = torch.ops.aten

ALWAYS = {
    aten._local_scalar_dense.default,
    aten.nonzero.default,
    aten.masked_select.default,
    aten.equal.default,
    aten.is_nonzero.default,
    aten._unique2.default,
    aten.unique_consecutive.default,
    aten._linalg_check_errors.default,
    aten._linalg_eigh.default,
    aten._linalg_svd.default,
    aten.linalg_eig.default,
}
CHECKED_EX = {
    aten.linalg_cholesky_ex.default,
    aten.linalg_inv_ex.default,
    aten.linalg_lu_factor_ex.default,
    aten.linalg_ldl_factor_ex.default,
}


def _argument(func, args, kwargs, name):
    for i, arg in enumerate(func._schema.arguments):
        if arg.name == name:
            if name in kwargs:
                return kwargs[name]
            return args[i] if i < len(args) else arg.default_value
    raise KeyError(name)


class SyncCounter(TorchDispatchMode):
    """``with SyncCounter() as s: ...`` then ``s.total`` and ``s.by_op`` (op name -> count)."""

    def __init__(self):
        super().__init__()
        self.by_op: Counter[str] = Counter()

    @property
    def total(self) -> int:
        return sum(self.by_op.values())

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        kwargs = kwargs or {}
        packet = func.overloadpacket
        if func in ALWAYS or (func in CHECKED_EX and _argument(func, args, kwargs, "check_errors")):
            self.by_op[packet.__name__] += 1
        elif packet in (aten._to_copy, aten.copy_):
            src = args[1] if packet is aten.copy_ else args[0]
            dst = kwargs.get("device")
            dst_type = args[0].device.type if packet is aten.copy_ else (torch.device(dst).type if dst else None)
            if dst_type == "cpu" and src.device.type != "cpu":
                self.by_op["device_to_host"] += 1
        return func(*args, **kwargs)


class OpCounter(TorchDispatchMode):
    """``with OpCounter() as ops: ...`` then ``ops.total``: every aten op dispatched (on a GPU, about
    one kernel launch each)."""

    def __init__(self):
        super().__init__()
        self.total = 0

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        self.total += 1
        return func(*args, **(kwargs or {}))
