"""What a call may not change in a model: parameters and buffers (bitwise), requires_grad flags,
gradients, train/eval modes, module types, hooks, module attributes and the config (used by the
robustness, planner, data-edge and PEFT-edge tests)."""
import torch
from torch import nn


def _bits(t: torch.Tensor) -> torch.Tensor:
    # Bitwise view, so that NaN compares equal to the same NaN.
    return t.detach().contiguous().reshape(-1).view(torch.uint8).clone()


class ModelState:
    def __init__(self, model: nn.Module):
        self.model = model
        self.params = {n: _bits(p) for n, p in model.named_parameters()}
        self.buffers = {n: _bits(b) for n, b in model.named_buffers()}
        self.flags = {n: p.requires_grad for n, p in model.named_parameters()}
        self.grads = {n: p.grad for n, p in model.named_parameters()}
        self.modes = {n: m.training for n, m in model.named_modules()}
        self.modules = {n: type(m) for n, m in model.named_modules()}
        self.hooks = {n: (len(m._forward_hooks), len(m._forward_pre_hooks), len(m._backward_hooks),
                          len(m._backward_pre_hooks)) for n, m in model.named_modules()}
        # Attributes set on modules (peft_config, _hf_peft_config_loaded, PEFT's adapter switches):
        # which exist, and the value of the plain ones.
        self.attrs = {n: set(vars(m)) for n, m in model.named_modules()}
        self.values = {n: {k: v for k, v in vars(m).items() if isinstance(v, (bool, int, float, str, type(None)))}
                       for n, m in model.named_modules()}
        config = getattr(model, "config", None)
        self.config = config.to_dict() if hasattr(config, "to_dict") else None

    def assert_unchanged(self):
        now = ModelState(self.model)
        assert now.modules == self.modules
        assert now.params.keys() == self.params.keys()
        for n in self.params:
            assert torch.equal(now.params[n], self.params[n]), f"parameter {n} changed"
        for n in self.buffers:
            assert torch.equal(now.buffers[n], self.buffers[n]), f"buffer {n} changed"
        assert now.flags == self.flags
        assert all(now.grads[n] is self.grads[n] for n in self.grads)
        assert now.modes == self.modes
        assert now.hooks == self.hooks
        assert now.attrs == self.attrs
        assert now.values == self.values
        assert now.config == self.config
