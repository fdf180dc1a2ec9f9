// cuda_emu stand-in for <cuda_runtime.h>: see cuda_emu.h.
#include "cuda_emu.h"
