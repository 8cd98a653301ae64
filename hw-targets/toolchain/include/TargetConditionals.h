/* Stand-in for the Apple SDK's <TargetConditionals.h>, for `cargo check` of the
 * darwin targets on Linux, where there is no SDK (see darwin-*-cc). ring's
 * base.h includes it under __APPLE__ and reads TARGET_OS_OSX / TARGET_OS_IPHONE.
 * The objects built with it are never linked. On a Mac the wrappers use the SDK. */
#ifndef VIGO_TARGET_CONDITIONALS_SHIM_H
#define VIGO_TARGET_CONDITIONALS_SHIM_H
#define TARGET_OS_MAC 1
#define TARGET_OS_OSX 1
#define TARGET_OS_IPHONE 0
#define TARGET_OS_IOS 0
#define TARGET_OS_TV 0
#define TARGET_OS_WATCH 0
#define TARGET_OS_SIMULATOR 0
#endif
