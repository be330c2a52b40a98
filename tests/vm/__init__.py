"""The VM boot test: images (kernel, LUKS disk, initramfs with our module) and the qemu runner."""
