/* Decode only the part of a JPEG a crop needs: libjpeg-turbo's DCT scaling (k/8), jpeg_crop_scanline (only the
 * iMCU columns covering the crop go through the inverse DCT, upsampling and colour conversion) and
 * jpeg_skip_scanlines (rows above the crop are entropy-decoded only; rows below are never read).
 * Built on first use by pipelines/jpeg_crop.py (cc -O2 -shared ... -ljpeg) and called through ctypes. */
#include <setjmp.h>
#include <stdio.h>
#include <string.h>
#include <jpeglib.h>

struct fsm_err {
  struct jpeg_error_mgr pub;
  jmp_buf jump;
  int strict;
  char msg[JMSG_LENGTH_MAX];
};

static void fsm_error_exit(j_common_ptr c) {
  struct fsm_err *e = (struct fsm_err *)c->err;
  (*c->err->format_message)(c, e->msg);
  longjmp(e->jump, 1);
}

static void fsm_emit_message(j_common_ptr c, int level) {
  struct fsm_err *e = (struct fsm_err *)c->err;
  if (level < 0 && e->strict) { /* a warning: damaged data that libjpeg would patch over */
    (*c->err->format_message)(c, e->msg);
    longjmp(e->jump, 2);
  }
}

/* Image size at scale k/8 (the output_width / output_height a decode would give). Returns 0, or 1 with msg. */
int fsm_scaled_size(const unsigned char *data, unsigned long size, int k, int *w, int *h, char *msg, int msg_len) {
  struct jpeg_decompress_struct cinfo;
  struct fsm_err e;
  cinfo.err = jpeg_std_error(&e.pub);
  e.pub.error_exit = fsm_error_exit;
  e.pub.emit_message = fsm_emit_message;
  e.strict = 0;
  if (setjmp(e.jump)) {
    snprintf(msg, msg_len, "%s", e.msg);
    jpeg_destroy_decompress(&cinfo);
    return 1;
  }
  jpeg_create_decompress(&cinfo);
  jpeg_mem_src(&cinfo, data, size);
  jpeg_read_header(&cinfo, TRUE);
  cinfo.out_color_space = JCS_RGB;
  cinfo.scale_num = k;
  cinfo.scale_denom = 8;
  jpeg_calc_output_dimensions(&cinfo);
  *w = cinfo.output_width;
  *h = cinfo.output_height;
  jpeg_destroy_decompress(&cinfo);
  return 0;
}

/* Rows [y0, y0 + h) and columns [x0, x0 + w) of the image decoded at scale k/8 (coordinates in scaled pixels),
 * RGB. libjpeg widens the columns to whole iMCUs: *xoff (<= x0) and *cw (>= w) say where the decoded rows start
 * and how wide they are; row r is written at out + r * cw * 3 (the caller gives h * (w + 64) * 3 bytes: the
 * widening is under one iMCU, at most 32 pixels, on each side). Returns 0, 1 (error) or 2 (damaged data in
 * strict mode), with the message in msg. */
int fsm_decode_crop(const unsigned char *data, unsigned long size, int k, int x0, int y0, int w, int h,
                    unsigned char *out, int *xoff, int *cw, int strict, char *msg, int msg_len) {
  struct jpeg_decompress_struct cinfo;
  struct fsm_err e;
  volatile int rc = 0;
  cinfo.err = jpeg_std_error(&e.pub);
  e.pub.error_exit = fsm_error_exit;
  e.pub.emit_message = fsm_emit_message;
  e.strict = strict;
  if ((rc = setjmp(e.jump)) != 0) {
    snprintf(msg, msg_len, "%s", e.msg);
    jpeg_destroy_decompress(&cinfo);
    return rc;
  }
  jpeg_create_decompress(&cinfo);
  jpeg_mem_src(&cinfo, data, size);
  jpeg_read_header(&cinfo, TRUE);
  cinfo.out_color_space = JCS_RGB;
  cinfo.scale_num = k;
  cinfo.scale_denom = 8;
  jpeg_start_decompress(&cinfo);
  JDIMENSION xo = (JDIMENSION)x0, width = (JDIMENSION)w;
  if (w < (int)cinfo.output_width)
    jpeg_crop_scanline(&cinfo, &xo, &width);
  else
    xo = 0, width = cinfo.output_width;
  *xoff = (int)xo;
  *cw = (int)width;
  if (y0 > 0)
    jpeg_skip_scanlines(&cinfo, (JDIMENSION)y0);
  for (int r = 0; r < h; r++) {
    JSAMPROW row = out + (size_t)r * width * 3;
    jpeg_read_scanlines(&cinfo, &row, 1);
  }
  jpeg_abort_decompress(&cinfo);
  jpeg_destroy_decompress(&cinfo);
  return 0;
}
