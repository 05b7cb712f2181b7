"""Authorization at run time and from the command line: `mesh authz check/matrix/deny/show` and the run-time
denies in Consul KV."""
