"""The qemu guest harness: IPVS tests need a kernel with IPVS (see harness.py)."""
