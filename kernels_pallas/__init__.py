"""kernels_pallas package."""
