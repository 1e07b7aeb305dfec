"""Data layer: manifests, patient-grouped splits, byte I/O, decoding and letterbox."""
