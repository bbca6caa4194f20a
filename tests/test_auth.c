/*
 * test_auth.c — coordinator/auth: key files (comments, blanks, trimming, errors that name
 * the file), verdicts (401 / 403 / allow, admin vs inference, no admin file), the
 * constant-time comparison, and SIGHUP-style reloads that keep the old keys on error.
 */
#include <setjmp.h>
#include <stdarg.h>
#include <stddef.h>
#include <stdint.h>

#include <cmocka.h>

#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <unistd.h>

#include "coordinator/auth.h"

static char *write_tmp(const char *content)
{
    char *path = strdup("/tmp/tsr-auth-XXXXXX");
    int fd = mkstemp(path);
    assert_true(fd >= 0);
    assert_int_equal(write(fd, content, strlen(content)), (ssize_t)strlen(content));
    close(fd);
    return path;
}

static tsr_auth_verdict check(tsr_auth *a, const char *hdr, bool admin)
{
    char why[256];
    why[0] = '\0';
    tsr_auth_verdict v = tsr_auth_check(a, hdr, hdr ? strlen(hdr) : 0, admin, why, sizeof why);
    if (v != TSR_AUTH_ALLOW) assert_true(why[0] != '\0');
    return v;
}

static void test_key_equal(void **state)
{
    (void)state;
    assert_true(tsr_auth_key_equal("abc", 3, "abc", 3));
    assert_false(tsr_auth_key_equal("abd", 3, "abc", 3));
    assert_false(tsr_auth_key_equal("ab", 2, "abc", 3));
    assert_false(tsr_auth_key_equal("abcabc", 6, "abc", 3)); /* repeats of the key */
    assert_false(tsr_auth_key_equal("", 0, "abc", 3));
    assert_false(tsr_auth_key_equal("", 0, "", 0));
}

static void test_verdicts(void **state)
{
    (void)state;
    char *api = write_tmp("# inference keys\n\n  key-one  \nkey-two\r\n");
    char *admin = write_tmp("admin-1\n");
    tsr_auth *a = NULL;
    char err[512];
    assert_int_equal(tsr_auth_new(api, admin, &a, err, sizeof err), 0);
    assert_true(tsr_auth_enabled(a));
    assert_int_equal(check(a, NULL, false), TSR_AUTH_UNAUTHENTICATED);
    assert_int_equal(check(a, "", false), TSR_AUTH_UNAUTHENTICATED);
    assert_int_equal(check(a, "key-one", false), TSR_AUTH_UNAUTHENTICATED); /* no scheme */
    assert_int_equal(check(a, "Basic key-one", false), TSR_AUTH_UNAUTHENTICATED);
    assert_int_equal(check(a, "Bearer key-on", false), TSR_AUTH_UNAUTHENTICATED);
    assert_int_equal(check(a, "Bearer # inference keys", false), TSR_AUTH_UNAUTHENTICATED);
    assert_int_equal(check(a, "Bearer key-one", false), TSR_AUTH_ALLOW);
    assert_int_equal(check(a, "bearer   key-two ", false), TSR_AUTH_ALLOW);
    assert_int_equal(check(a, "Bearer key-one", true), TSR_AUTH_FORBIDDEN);
    assert_int_equal(check(a, "Bearer admin-1", true), TSR_AUTH_ALLOW);
    assert_int_equal(check(a, "Bearer admin-1", false), TSR_AUTH_ALLOW);
    assert_int_equal(check(a, "Bearer wrong", true), TSR_AUTH_UNAUTHENTICATED);
    tsr_auth_free(a);

    /* only inference keys: admin calls are refused for every key */
    assert_int_equal(tsr_auth_new(api, NULL, &a, err, sizeof err), 0);
    assert_int_equal(check(a, "Bearer key-one", true), TSR_AUTH_FORBIDDEN);
    assert_int_equal(check(a, "Bearer key-one", false), TSR_AUTH_ALLOW);
    tsr_auth_free(a);

    /* no key file: everything allowed; NULL too */
    assert_int_equal(tsr_auth_new(NULL, NULL, &a, err, sizeof err), 0);
    assert_false(tsr_auth_enabled(a));
    assert_int_equal(check(a, NULL, true), TSR_AUTH_ALLOW);
    tsr_auth_free(a);
    assert_int_equal(check(NULL, NULL, true), TSR_AUTH_ALLOW);
    unlink(api);
    unlink(admin);
    free(api);
    free(admin);
}

static void test_file_errors(void **state)
{
    (void)state;
    tsr_auth *a = NULL;
    char err[512];
    assert_true(tsr_auth_new("/nonexistent/keys", NULL, &a, err, sizeof err) < 0);
    assert_null(a);
    assert_non_null(strstr(err, "--api-key-file /nonexistent/keys"));
    char *empty = write_tmp("# nothing\n\n   \n");
    assert_true(tsr_auth_new(NULL, empty, &a, err, sizeof err) < 0);
    assert_non_null(strstr(err, "--admin-key-file"));
    assert_non_null(strstr(err, "no key"));
    unlink(empty);
    free(empty);
}

static void test_reload(void **state)
{
    (void)state;
    char *api = write_tmp("old-key\n");
    tsr_auth *a = NULL;
    char err[512];
    assert_int_equal(tsr_auth_new(api, NULL, &a, err, sizeof err), 0);
    assert_int_equal(check(a, "Bearer old-key", false), TSR_AUTH_ALLOW);
    FILE *f = fopen(api, "w");
    fputs("new-key\nsecond\n", f);
    fclose(f);
    int n_api = -1, n_admin = -1;
    assert_int_equal(tsr_auth_reload(a, &n_api, &n_admin, err, sizeof err), 0);
    assert_int_equal(n_api, 2);
    assert_int_equal(n_admin, 0);
    assert_int_equal(check(a, "Bearer old-key", false), TSR_AUTH_UNAUTHENTICATED);
    assert_int_equal(check(a, "Bearer second", false), TSR_AUTH_ALLOW);
    /* a broken file keeps the keys in force */
    f = fopen(api, "w");
    fputs("# emptied by mistake\n", f);
    fclose(f);
    assert_true(tsr_auth_reload(a, NULL, NULL, err, sizeof err) < 0);
    assert_non_null(strstr(err, "no key"));
    assert_int_equal(check(a, "Bearer new-key", false), TSR_AUTH_ALLOW);
    tsr_auth_free(a);
    unlink(api);
    free(api);
}

int main(void)
{
    const struct CMUnitTest tests[] = {
        cmocka_unit_test(test_key_equal),
        cmocka_unit_test(test_verdicts),
        cmocka_unit_test(test_file_errors),
        cmocka_unit_test(test_reload),
    };
    return cmocka_run_group_tests(tests, NULL, NULL);
}
