"""Reading Ansible inventories exactly as ansible-inventory does, and the mesh variables they carry."""
