// Controls the core's logging (key=value lines on stderr).
#pragma once

namespace kvpool {

/// Drops core log lines below `level` (10 debug, 20 info, 30 warning, 40 error). Default: 30.
void SetLogThreshold(int level);

}  // namespace kvpool
