"""DNS on tapstack: an authoritative server (zone files), written against asyncio only.

Messages are read and written with dnspython: its wire codec and RFC 1035 zone-file
parser are complete and well kept (names, compression, EDNS, every record type), and
DNS parsing is exactly the hostile-input code not to write again by hand."""
