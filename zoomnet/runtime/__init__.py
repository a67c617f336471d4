"""The process a run lives in: the device, torch.distributed, glibc's allocator, and a
report of the installation (``zoomnet doctor``). Nothing else in the package changes
process-wide state."""
