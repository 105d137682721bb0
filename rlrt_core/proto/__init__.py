"""Generated protobuf / gRPC modules for package rlrt.v1 (see scripts/gen_protos.py)."""
