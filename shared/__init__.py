"""What every Grantwire service shares: contracts, messaging kit, MongoDB, logging."""
