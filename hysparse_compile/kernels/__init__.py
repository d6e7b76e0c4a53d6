"""HySparse kernels: one folder per backend (reference, flex, triton), registered once as custom ops in `ops`."""
