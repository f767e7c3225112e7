# AOT ID: ['10_inference']
from ctypes import c_void_p, c_long, c_int
import torch
import math
import random
import os
import tempfile
from math import inf, nan
from cmath import nanj
from torch._inductor.hooks import run_intermediate_hooks
from torch._inductor.utils import maybe_profile
from torch._inductor.codegen.memory_planning import _align as align
from torch import device, empty_strided
from torch._inductor.async_compile import AsyncCompile
from torch._inductor.select_algorithm import extern_kernels

aten = torch.ops.aten
inductor_ops = torch.ops.inductor
_quantized = torch.ops._quantized
assert_size_stride = torch._C._dynamo.guards.assert_size_stride
assert_alignment = torch._C._dynamo.guards.assert_alignment
empty_strided_cpu = torch._C._dynamo.guards._empty_strided_cpu
empty_strided_cpu_pinned = torch._C._dynamo.guards._empty_strided_cpu_pinned
empty_strided_cuda = torch._C._dynamo.guards._empty_strided_cuda
empty_strided_xpu = torch._C._dynamo.guards._empty_strided_xpu
empty_strided_mtia = torch._C._dynamo.guards._empty_strided_mtia
reinterpret_tensor = torch._C._dynamo.guards._reinterpret_tensor
alloc_from_pool = torch.ops.inductor._alloc_from_pool
async_compile = AsyncCompile()
empty_strided_p2p = torch._C._distributed_c10d._SymmetricMemory.empty_strided_p2p


cpp_fused_add_mul_sum_0 = async_compile.cpp_pybinding(['const float*', 'const float*', 'float*'], r'''
#include <torch/csrc/inductor/cpp_prefix.h>
extern "C"  void  kernel(const float* in_ptr0,
                       const float* in_ptr1,
                       float* out_ptr0)
{
    std::atomic<int> inductor_cpu_integer_div_error{0};
    inductor_cpu_integer_div_error_flag = &inductor_cpu_integer_div_error;
    {
        #pragma GCC ivdep
        for(int64_t x0=static_cast<int64_t>(0L); x0<static_cast<int64_t>(3L); x0+=static_cast<int64_t>(1L))
        {
            {
                {
                    auto tmp0 = in_ptr0[static_cast<int64_t>(4L*x0)];
                    auto tmp3 = in_ptr1[static_cast<int64_t>(4L*x0)];
                    auto tmp5 = in_ptr0[static_cast<int64_t>(1L + 4L*x0)];
                    auto tmp7 = in_ptr1[static_cast<int64_t>(1L + 4L*x0)];
                    auto tmp10 = in_ptr0[static_cast<int64_t>(2L + 4L*x0)];
                    auto tmp12 = in_ptr1[static_cast<int64_t>(2L + 4L*x0)];
                    auto tmp15 = in_ptr0[static_cast<int64_t>(3L + 4L*x0)];
                    auto tmp17 = in_ptr1[static_cast<int64_t>(3L + 4L*x0)];
                    auto tmp1 = static_cast<float>(2.0);
                    auto tmp2 = float(tmp0 * tmp1);
                    auto tmp4 = float(tmp2 + tmp3);
                    auto tmp6 = float(tmp5 * tmp1);
                    auto tmp8 = float(tmp6 + tmp7);
                    auto tmp9 = float(tmp4 + tmp8);
                    auto tmp11 = float(tmp10 * tmp1);
                    auto tmp13 = float(tmp11 + tmp12);
                    auto tmp14 = float(tmp9 + tmp13);
                    auto tmp16 = float(tmp15 * tmp1);
                    auto tmp18 = float(tmp16 + tmp17);
                    auto tmp19 = float(tmp14 + tmp18);
                    out_ptr0[static_cast<int64_t>(x0)] = tmp19;
                }
            }
        }
    }
    inductor_cpu_integer_div_error_flag = nullptr;
    inductor_cpu_throw_if_integer_div_error(inductor_cpu_integer_div_error);
}
''')


async_compile.wait(globals())
del async_compile

class Runner:
    def __init__(self, partitions):
        self.partitions = partitions

    def recursively_apply_fns(self, fns):
        new_callables = []
        for fn, c in zip(fns, self.partitions):
            new_callables.append(fn(c))
        self.partitions = new_callables

    def call(self, args):
        arg0_1, arg1_1 = args
        args.clear()
        assert_size_stride(arg0_1, (3, 4), (4, 1), 'input')
        assert_size_stride(arg1_1, (3, 4), (4, 1), 'input')
        buf0 = empty_strided_cpu((3, ), (1, ), torch.float32)
        cpp_fused_add_mul_sum_0(arg0_1, arg1_1, buf0)
        del arg0_1
        del arg1_1
        return (buf0, )

runner = Runner(partitions=[])
call = runner.call
recursively_apply_fns = runner.recursively_apply_fns


def get_args():
    from torch._dynamo.testing import rand_strided
    arg0_1 = rand_strided((3, 4), (4, 1), device='cpu', dtype=torch.float32)
    arg1_1 = rand_strided((3, 4), (4, 1), device='cpu', dtype=torch.float32)
    return [arg0_1, arg1_1]


def benchmark_compiled_module(args, times=10, repeat=10):
    from torch._inductor.utils import print_performance
    fn = lambda: call(list(args))
    return print_performance(fn, times=times, repeat=repeat, device='cpu')


if __name__ == "__main__":
    from torch._inductor.wrapper_benchmark import compiled_module_main
    args = get_args()
    compiled_module_main('None', lambda times, repeat: benchmark_compiled_module(args, times=times, repeat=repeat))
