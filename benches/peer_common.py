"""What the Python peers (triton_peer.py, torch_decode_peer.py) share: the device's copy bandwidth,
measured the way mangrove measures it (a 1 GiB device-to-device copy, bytes read plus written)."""

import statistics

import torch


def copy_bandwidth_gbs(dev, nbytes=1 << 30):
    """Median GB/s (read + write) of 10 timed copies of `nbytes` random bytes on `dev`."""
    src = torch.randint(0, 256, (nbytes,), dtype=torch.uint8, device=dev)
    dst = torch.empty_like(src)
    for _ in range(3):
        dst.copy_(src)
    torch.cuda.synchronize()
    start, stop = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
    ms = []
    for _ in range(10):
        start.record()
        dst.copy_(src)
        stop.record()
        stop.synchronize()
        ms.append(start.elapsed_time(stop))
    del src, dst
    return 2 * nbytes / (statistics.median(ms) * 1e-3) / 1e9
