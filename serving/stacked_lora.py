"""Mixed-adapter batches in two batched matmuls per layer: every adapter's LoRA weights stacked.

peft's mixed batch (`adapter_names=[...]`) loops, in every LoRA layer and at every generated token,
over the batch's distinct adapters: select that adapter's rows, run its `lora_A` and `lora_B`,
scatter the result back. With 8 adapters that is 8 small chains per layer per token, and on a CPU
(or for a small model anywhere) their overhead is most of a mixed batch's time. S-LoRA and Punica
(Sheng et al. 2023, Chen et al. 2023; vLLM's multi-LoRA kernels) gather each row's own LoRA
weights instead and compute every row at once; this is that idea in plain torch:

    A_S,in,r / B_S,r,out   one slot per adapter in the model (slot 0: zeros, the base model's
                           rows), ranks zero-padded to the largest, scaling folded into B;
    per `generate` call    A_B,in,r = A[slot of each row] (once: the rows do not change);
    per layer and token    y = base(x) + (x @ A_B) @ B_B         (torch.bmm, all rows at once)

Zero padding and the zero slot add exact zeros, so each row gets its own adapter's update, as
peft computes it, up to float summation order. The stacks are rebuilt only when the adapters in
the model change (a load, an eviction, a replacement), at the cost of one more copy of the
resident adapters' weights.

`StackedLoRA.supports(model)` is False, and the caller keeps peft's own path, for anything but
vanilla LoRA on `nn.Linear` layers: DoRA and other variants, LoRA on embeddings or convolutions,
`fan_in_fan_out` (GPT-2's Conv1D), a LoRA bias, or MoE expert LoRA (`target_parameters`).
"""

from __future__ import annotations

import contextlib


class StackedLoRA:
    """The stacked LoRA weights of one PeftModel, and a context that routes a batch through them."""

    def __init__(self):
        self._key = None
        self._slots: dict[str, int] = {}
        self._stacks: dict[str, tuple] = {}  # module name -> (A_S,in,r, B_S,r,out)

    @staticmethod
    def _layers(model) -> dict:
        from peft.tuners.lora import LoraLayer

        return {name: m for name, m in model.named_modules() if isinstance(m, LoraLayer)}

    @classmethod
    def supports(cls, model) -> bool:
        """Whether every LoRA layer of `model` is vanilla LoRA on a Linear (see the module docstring)."""
        import torch
        from peft.tuners.lora import Linear

        layers = cls._layers(model)
        if not layers:
            return False
        for layer in layers.values():
            if type(layer) is not Linear or not isinstance(layer.get_base_layer(), torch.nn.Linear):
                return False
            if getattr(layer, "fan_in_fan_out", False) or getattr(layer, "lora_variant", None):
                return False
            if any(b.bias is not None for b in layer.lora_B.values()):
                return False
        return True

    def _refresh(self, layers: dict) -> None:
        """(Re)build the stacks when the adapters in the model changed since the last call."""
        import torch

        first = next(iter(layers.values()))
        key = tuple(sorted((name, id(a.weight)) for name, a in first.lora_A.items()))
        if key == self._key:
            return
        names = [name for name, _ in key]
        self._slots = {name: slot for slot, name in enumerate(names, start=1)}
        self._stacks = {}
        for module_name, layer in layers.items():
            base = layer.get_base_layer()
            r_max = max(layer.lora_A[name].weight.shape[0] for name in names)
            dtype, device = base.weight.dtype, base.weight.device
            A = torch.zeros(len(names) + 1, base.in_features, r_max, dtype=dtype, device=device)
            B = torch.zeros(len(names) + 1, r_max, base.out_features, dtype=dtype, device=device)
            for name, slot in self._slots.items():
                a, b = layer.lora_A[name].weight, layer.lora_B[name].weight  # (r, in), (out, r)
                r = a.shape[0]
                A[slot, :, :r] = a.detach().t().to(dtype)
                B[slot, :r, :] = (b.detach().t() * layer.scaling[name]).to(dtype)
            self._stacks[module_name] = (A, B)
        self._key = key

    @contextlib.contextmanager
    def rows(self, model, adapter_names: list[str], base_name: str):
        """Inside, `model` (a PeftModel) applies to row i of every forward the adapter
        `adapter_names[i]` (`base_name`: none), through the stacks; peft's own LoRA is off."""
        import torch

        layers = self._layers(model)
        self._refresh(layers)
        slots = torch.tensor([0 if name == base_name else self._slots[name] for name in adapter_names])
        gathered = {}
        for module_name, (A, B) in self._stacks.items():
            index = slots.to(A.device)
            gathered[module_name] = (A[index], B[index])  # per row: (rows, in, r), (rows, r, out)

        def add_lora(module_name):
            def hook(_module, args, output):
                A_Bir, B_Bro = gathered[module_name]
                x = args[0]
                if x.dim() != 3 or x.shape[0] != A_Bir.shape[0]:
                    raise RuntimeError(f"stacked LoRA expects (rows, tokens, features) inputs, got {tuple(x.shape)}")
                return output + torch.bmm(torch.bmm(x.to(A_Bir.dtype), A_Bir), B_Bro).to(output.dtype)

            return hook

        handles = [layer.register_forward_hook(add_lora(name)) for name, layer in layers.items()]
        try:
            with model.disable_adapter():  # peft's layers return the base layer's output; the hooks add LoRA
                yield
        finally:
            for handle in handles:
                handle.remove()
