/* generate.c — see generate.h. */
#include "coordinator/generate.h"

const char *tsr_finish_reason_name(tsr_finish_reason r)
{
    switch (r) {
    case TSR_FINISH_LENGTH:
        return "length";
    case TSR_FINISH_STOP:
        return "stop";
    case TSR_FINISH_EOS:
        return "eos";
    }
    return "unknown";
}
