"""kube-proxy's nftables-mode tables, deleted once pyproxy's iptables rules have replaced them.

Upstream kube-proxy in nftables mode keeps all its rules in the tables `ip kube-proxy` and
`ip6 kube-proxy`, which it leaves in the kernel when it stops. When pyproxy (iptables mode)
takes over a node, both rule sets translate Service traffic at the same hook priority (dstnat)
until those tables are gone, and the NAT chain the kernel runs first wins: at equal priority the
one registered last, which is kube-proxy's wherever the iptables nat table existed before it. A
Service changed since kube-proxy stopped would still be served by its stale rules. Upstream's
iptables mode deletes the tables at start, before its own first sync, which leaves the node
without Service rules until then; pyproxy deletes a family's table right after its first
successful full sync of that family, so some rules serve every new connection at every moment
(docs/deploy.md).

Deleting a table is one atomic nftables transaction. Without the `nft` binary nothing is
deleted (logged at debug level): the rules keep working, and `nft delete table ip kube-proxy`
finishes the job by hand.
"""

from __future__ import annotations

import shutil

import structlog

from pyproxy.errors import KernelError
from pyproxy.model import IPFamily
from pyproxy.nftables.nft import Nft

logger = structlog.get_logger("pyproxy")

KUBE_PROXY_TABLE = "kube-proxy"


def _nft_family(family: IPFamily) -> str:
    return "ip" if family is IPFamily.IPv4 else "ip6"


def delete_kube_proxy_table(family: IPFamily) -> bool | None:
    """Delete kube-proxy's nftables table of `family` if it exists.

    Returns True if a table was deleted, False if there was none, None if `nft` is missing."""
    if shutil.which("nft") is None:
        return None
    nft = Nft(_nft_family(family), KUBE_PROXY_TABLE)
    if not nft.names().exists:
        return False
    nft.delete_table()
    return True


def remove_after_sync(family: IPFamily) -> bool:
    """After a full iptables sync: delete kube-proxy's nftables-mode table of `family`, now that
    pyproxy's rules serve. True once done or nothing to do; False to retry
    after the next full sync."""
    try:
        deleted = delete_kube_proxy_table(family)
    except KernelError as err:
        logger.warning(
            "cannot delete kube-proxy's nftables table", ip_family=family.value, error=str(err)
        )
        return False
    if deleted:
        logger.info(
            "deleted kube-proxy's nftables table (nftables mode leftovers)",
            ip_family=family.value,
            table=KUBE_PROXY_TABLE,
        )
    elif deleted is None:
        logger.debug("no nft binary: kube-proxy's nftables tables, if any, are left")
    return True
