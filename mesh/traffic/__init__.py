"""Run-time traffic changes: overrides of a service's routing kept in Consul KV (`mesh route`, `mesh fault`) and
`mesh rollout`, which moves weight to a new version step by step while it watches the fleet's numbers."""
