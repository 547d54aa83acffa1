"""Entry point of the bundled mooncake plugin: registers the ``mooncake`` transfer store."""

from specforge_core import hookimpl
from specforge_mooncake.options import MooncakeOptions
from specforge_mooncake.provider import make_mooncake


@hookimpl
def register_transfer_stores(register):
    register(
        "mooncake", make_mooncake, config=MooncakeOptions,
        description="Mooncake distributed store (RDMA or TCP), zero-copy registered buffers",
    )
