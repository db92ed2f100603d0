// Cached device queries shared by the kernel launchers.
#pragma once

namespace fp8kern {

// The device current on this thread (the binding sets it to the tensors' device before launching).
int current_device();
// Multiprocessor count of a device, queried once.
int sm_count(int device);

}  // namespace fp8kern
