/*
 * comm_deadpeer.c — a rank dies in the middle of an allreduce loop; the job must end.
 *
 * Run by tests/comm_deadpeer.sh under `mpirun -np 3`: ranks loop over allreduces, and at
 * iteration 5 rank 2 sends itself SIGKILL while ranks 0 and 1 enter the next allreduce. The
 * survivors must not hang: Open MPI's mpirun notices the death and kills the job (~1–2 s),
 * and, as a second line of defence, the communicator's 5 s deadline turns the wait into
 * TSR_COMM_ETIMEOUT (the survivor then reports and exits non-zero). The wrapper checks that
 * the job ends in time, fails, and that the output names rank 2.
 *
 * Not a test_* program: it only makes sense under the wrapper.
 */
#include <signal.h>
#include <stdio.h>

#include "worker/comm.h"

int main(void)
{
    char err[512] = "";
    tsr_comm *w = NULL;
    if (tsr_comm_mpi_world(&w, err, sizeof err) != TSR_COMM_OK) {
        fprintf(stderr, "comm_deadpeer: %s\n", err);
        return 1;
    }
    if (w->size != 3) {
        fprintf(stderr, "comm_deadpeer: needs exactly 3 ranks, got %d\n", w->size);
        tsr_comm_free(w);
        tsr_comm_mpi_finalize();
        return 2;
    }
    tsr_comm_set_timeout_ms(w, 5000);
    float buf[1024];
    for (int it = 0; it < 1000; it++) {
        if (w->rank == 2 && it == 5) {
            /* said without the words the wrapper greps for ("rank 2 ... signal") */
            fprintf(stderr, "comm_deadpeer: the third rank kills itself now (iteration %d)\n", it);
            fflush(stderr);
            raise(SIGKILL);
        }
        for (int i = 0; i < 1024; i++) buf[i] = (float)(w->rank + i);
        int rc = tsr_comm_allreduce_sum_f32(w, buf, 1024, err, sizeof err);
        if (rc != TSR_COMM_OK) {
            fprintf(stderr, "comm_deadpeer: rank %d, iteration %d: %s: %s\n", w->rank, it,
                    tsr_comm_status_name(rc), err);
            tsr_comm_free(w);
            tsr_comm_mpi_finalize(); /* skips MPI_Finalize: the allreduce is still pending */
            return 3;
        }
    }
    fprintf(stderr,
            "comm_deadpeer: rank %d finished 1000 allreduces: the dead peer went unnoticed\n",
            w->rank);
    tsr_comm_free(w);
    tsr_comm_mpi_finalize();
    return 4;
}
