# Sourced by the MPI benchmarks (scaling.sh, zero_memory.sh, pipeline.sh) from the repository
# root: checks for mpirun, builds dits with MPI, and sets $dits, $tmp (removed on exit), $root
# (mpirun's flag for running as root) and OpenMPI's shared-memory transport.
command -v mpirun >/dev/null || { echo "error: mpirun not found (apt-get install openmpi-bin libopenmpi-dev)" >&2; exit 1; }
cargo build --release -q --features mpi
dits=$PWD/target/release/dits
tmp=$(mktemp -d); trap 'rm -rf "$tmp"' EXIT
root=$([ "$(id -u)" = 0 ] && echo --allow-run-as-root || true)
export OMPI_MCA_btl=self,vader OMPI_MCA_btl_vader_single_copy_mechanism=none
