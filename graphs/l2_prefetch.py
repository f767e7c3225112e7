"""Reading the next expert layer's weights into L2 while the current layer computes (an experiment).

The action expert's 50-row FP8 GEMMs are bound by each kernel's fixed latency, and part of that latency is
the first round trips to DRAM: alone in a graph, with their weights left in L2 by the previous replay, the
same GEMMs are faster than in the denoising loop, where each layer's weights come from DRAM (about 17 MB a
layer in FP8; L2 holds 50 MB). Here one small kernel per layer hands the next layer's weight bytes to
Hopper's bulk-copy engine as L2 prefetches (`cp.async.bulk.prefetch.L2`): the instructions are hints that
return at once, so the kernel takes no multiprocessor time beyond its launch, and the copy engine reads
DRAM while the current layer's GEMMs run. (An earlier attempt read the weights with an ordinary kernel on a
side stream: it held 40 multiprocessors for 100 us a layer and slowed the loop; docs/performance.md.)

CUDA with Triton on Hopper or newer only (`available`). The address table is built once from the weights
(they never move); each prefetch is an operator with a one-element sink it writes, so torch.compile keeps
it and keeps it in order after the tensor it is given as `after`.
"""

from __future__ import annotations

import torch

try:  # Triton comes with torch's CUDA wheels; the CPU-only environments (CI) have none
    import triton
    import triton.language as tl
except ImportError:  # pragma: no cover - depends on the environment
    triton = None

LANES = 128  # prefetch instructions a program issues, one per thread
DEFAULT_CHUNK = 16 * 1024  # bytes per prefetch instruction


def available(device: torch.device | str) -> tuple[bool, str]:
    device = torch.device(device)
    if device.type != "cuda" or not torch.cuda.is_available():
        return False, "L2 prefetch needs a CUDA GPU"
    if triton is None:
        return False, "L2 prefetch needs Triton (installed with torch's CUDA wheels)"
    if torch.cuda.get_device_capability(device) < (9, 0):
        return False, "L2 prefetch uses Hopper's bulk-copy engine (compute capability 9.0+)"
    return True, ""


class PrefetchTable:
    """The chunks of some tensors' storage, as a device table of addresses and sizes (each a multiple of
    16 bytes, at 16-byte-aligned addresses, as the instruction requires), padded to whole programs by
    repeating the last chunk."""

    def __init__(self, tensors: list[torch.Tensor], chunk: int = DEFAULT_CHUNK, evict_last: bool = False):
        if chunk % 16:
            raise ValueError(f"l2_prefetch: chunk must be a multiple of 16 bytes, got {chunk}")
        addresses, sizes = [], []
        for t in tensors:
            storage = t.untyped_storage()
            start, nbytes = storage.data_ptr(), storage.nbytes() // 16 * 16
            if start % 16:
                raise ValueError("l2_prefetch: storage not 16-byte aligned")
            for offset in range(0, nbytes, chunk):
                addresses.append(start + offset)
                sizes.append(min(chunk, nbytes - offset))
        if not addresses:
            raise ValueError("l2_prefetch: nothing to prefetch")
        padding = -len(addresses) % LANES
        addresses += addresses[-1:] * padding
        sizes += sizes[-1:] * padding
        device = tensors[0].device
        self.addresses = torch.tensor(addresses, dtype=torch.int64, device=device)
        self.sizes = torch.tensor(sizes, dtype=torch.int32, device=device)
        self.sink = torch.zeros(1, dtype=torch.int32, device=device)
        self.evict_last = evict_last
        self.nbytes = sum(sizes[: len(sizes) - padding])

    def __call__(self, after: torch.Tensor) -> None:
        prefetch_l2(self.addresses, self.sizes, self.sink, after, self.evict_last)


if triton is not None:

    @triton.jit
    def _prefetch_kernel(addresses_ptr, sizes_ptr, sink_ptr, LANES: tl.constexpr, EVICT_LAST: tl.constexpr):
        lanes = tl.program_id(0) * LANES + tl.arange(0, LANES)
        address = tl.load(addresses_ptr + lanes)
        size = tl.load(sizes_ptr + lanes)
        if EVICT_LAST:  # marked to stay in L2 past lines read once (the current layer's activations)
            issued = tl.inline_asm_elementwise(
                "{ .reg .b64 policy; createpolicy.fractional.L2::evict_last.b64 policy, 1.0; "
                "cp.async.bulk.prefetch.L2.global.L2::cache_hint [$1], $2, policy; mov.u32 $0, 0; }",
                "=r,l,r",
                [address, size],
                dtype=tl.int32,
                is_pure=False,
                pack=1,
            )
        else:
            issued = tl.inline_asm_elementwise(
                "{ cp.async.bulk.prefetch.L2.global [$1], $2; mov.u32 $0, 0; }",
                "=r,l,r",
                [address, size],
                dtype=tl.int32,
                is_pure=False,
                pack=1,
            )
        tl.store(sink_ptr, tl.sum(issued))


@torch.library.custom_op("vla_runtime::prefetch_l2", mutates_args=("sink",))
def prefetch_l2(
    addresses: torch.Tensor, sizes: torch.Tensor, sink: torch.Tensor, after: torch.Tensor, evict_last: bool
) -> None:
    """Issue an L2 prefetch of each (address, size) chunk; `after` only orders the call after the tensor
    it is given (the prefetch reads nothing of it)."""
    ok, why = available(addresses.device)
    if not ok:
        raise RuntimeError(f"prefetch_l2: {why}")
    _prefetch_kernel[(addresses.numel() // LANES,)](
        addresses, sizes, sink, LANES=LANES, EVICT_LAST=evict_last
    )


@prefetch_l2.register_fake
def _prefetch_l2_fake(addresses, sizes, sink, after, evict_last):
    return None


def expert_weight_tables(expert, chunk: int = DEFAULT_CHUNK, evict_last: bool = False) -> list[PrefetchTable]:
    """One table per expert layer: the FP8 weights of its q/k/v, output, gate/up and down GEMMs."""
    tables = []
    for layer in expert.layers:
        gemms = (
            layer.self_attn.qkv_quant,
            layer.self_attn.o_quant,
            layer.mlp.gate_up_quant,
            layer.mlp.down_quant,
        )
        if any(g is None for g in gemms):
            raise ValueError("l2_prefetch: the expert's FP8 GEMMs first (graphs/fp8.quantize_stack)")
        tables.append(PrefetchTable([g.weight_fp8 for g in gemms], chunk, evict_last))
    return tables
