"""``python -m sparseffn.methods``: print the registered methods as the README's table."""
from sparseffn.methods import methods_table

print(methods_table())
