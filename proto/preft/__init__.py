"""Generated protobuf modules of the ``preft`` protobuf package."""
