"""Head side: bringing a cluster up and down. The cluster spec, mpiexec's arguments and the
control plane, the ipyparallel adapter, our processes and their watchdog, bring-up and
tear-down."""
