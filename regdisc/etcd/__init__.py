"""The etcd backend: several stateless registry nodes sharing one etcd cluster."""
