// cuda_emu stand-in for <cuda_fp16.h>: see cuda_emu.h.
#include "cuda_emu.h"
