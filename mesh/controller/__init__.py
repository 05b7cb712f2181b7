"""mesh's controller: keeps every proxy's resource files and certificates current from Consul, over SSH."""
